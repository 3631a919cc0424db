"""whisper-serve's parts below its command (runtime.serve): OpenAI's protocol without HTTP
(`protocol`), the request scheduler that owns one model's engine (`scheduler`), the models served
by id, loaded on first use and unloaded least recently used first (`registry`), and the ASGI app
(`app`, which alone needs the `server` extra).
"""
