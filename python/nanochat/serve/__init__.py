"""OpenAI-compatible HTTP server and web chat page for a nanochat-ternary GGUF model.

`python -m nanochat.serve --model model.gguf`; the app factory is `nanochat.serve.app.create_app`.
"""
