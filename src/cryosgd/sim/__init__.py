"""Commands that write data: projections of maps and simulated particle datasets."""
