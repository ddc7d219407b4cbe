"""`personalize ui`: the whole flow in a browser — images in, concept out — beside the CLI, never apart from it.

- `options.py`: the training form's fields, read from the dataclasses that make the CLI's flags;
- `workspace.py`: the one folder the UI may read and write, uploads, and what the loader does to each image;
- `jobs.py`: every action is a `personalize ...` command in a child process, queued, watched through its files;
- `masks.py`: drawing `NAME.mask.png` on an image;
- `artefacts.py`: where each file of a run goes;
- `auth.py`: optional HTTP Basic authentication;
- `app.py`: the page (NiceGUI), which only wires these together.

The framework is NiceGUI rather than gradio: every gradio release since 4.0 caps Pillow below the 13.0 this
project pins, and NiceGUI (FastAPI + Vue/Quasar, all assets served locally, no telemetry) gives the same pieces —
uploads with size limits, timers for live progress, an image that reports mouse strokes for mask drawing, plain
ASGI middleware for authentication.
"""
