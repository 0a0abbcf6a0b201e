"""The lab's panels: each module builds its own components and wires its own events; app.py composes them."""
