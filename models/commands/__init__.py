"""CLI entries of the model commands (part of the CLI layer; the logic lives in ``models``)."""
