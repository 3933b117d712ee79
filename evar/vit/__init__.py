"""Vision transformers (a classifier family): timm's `VisionTransformer` layout, EVAR's own code, so a timm
checkpoint in safetensors loads strictly by name; `builtin:vit-digits` is one EVAR trained on digits."""
