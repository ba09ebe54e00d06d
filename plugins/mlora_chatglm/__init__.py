"""Built-in ChatGLM backends for mlora.

``chatglm``: ChatGLM2/3 checkpoints in THUDM's layout, run by a native model.
``glm``: GLM-4 checkpoints in transformers' format (``GlmForCausalLM``, ``Glm4ForCausalLM``).
"""
