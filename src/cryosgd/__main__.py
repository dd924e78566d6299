from cryosgd.cli import app

app(prog_name="cryosgd")
