"""``facellm-edge doctor``: what this machine and this install can run, each check a small function.

:mod:`.flavours` (which ONNX Runtime / OpenCV distributions make up the install) is also used by the runtime itself
to say which flavour to install; :mod:`.display` decides whether ``run`` can open a window.
"""
