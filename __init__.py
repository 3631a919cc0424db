"""whisper-max: OpenAI Whisper compiled to a Modular MAX program.

The repository's folders install under this one name: whisper_max.runtime (transcription, no
torch), whisper_max.converter (whisper-convert), whisper_max.golden, whisper_max.templates.

    from whisper_max import runtime
    result = runtime.load("tiny.en.maxpkg").transcribe("audio.wav")
"""
