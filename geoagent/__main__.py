from geoagent.cli import app

app()
