"""personalize: personalized text-to-image generation (Textual Inversion, BaTex, and more) on diffusers."""

__version__ = "0.1.0"
