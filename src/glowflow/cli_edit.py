"""CLI commands for latent-space editing: interpolate, directions, manipulate, demo."""


def register(sub) -> None:
    pass
