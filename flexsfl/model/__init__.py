"""The model, with torch: loading a Hugging Face model with PEFT LoRA and a task head, and cutting
it into the parts each side trains. Used by export, by the server and by the eager reference.
"""
