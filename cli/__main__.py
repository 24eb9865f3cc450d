from mirrord_cli.main import mirrord

mirrord()
