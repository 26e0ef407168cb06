"""Code both sides use: state names, devices. Never imports ``strategies/`` or server code."""
