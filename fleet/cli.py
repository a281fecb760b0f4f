"""The `fleet` command line."""

import typer

app = typer.Typer(help="Speculative LLM decoding for edge fleets over MQTT.", no_args_is_help=True)


@app.command()
def demo() -> None:
    """Run broker, server and boards locally and generate from shipped prompts."""
    typer.echo("fleet demo: not yet available")
