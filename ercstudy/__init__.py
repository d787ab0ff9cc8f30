"""ercstudy: MoE language-model studies with the expert-router coupling (ERC) loss."""

__version__ = "0.1.0"
