from cryosgd.cli import entry_point

entry_point()
