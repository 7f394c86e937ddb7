"""Adapting a pretrained model: LoRA/DoRA/QLoRA through peft, soft prompts."""
