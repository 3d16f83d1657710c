"""A stock architecture registered through the plugin, for the install smoke test.

Exercises the --user-dir registration path end to end with fairseq's own transformer.
"""
from fairseq.models import register_model_architecture
from fairseq.models.transformer import base_architecture


@register_model_architecture("transformer", "plugin_smoke_transformer")
def plugin_smoke_transformer(args):
    for name, value in (
        ("encoder_embed_dim", 16), ("encoder_ffn_embed_dim", 32), ("encoder_layers", 1),
        ("encoder_attention_heads", 2), ("decoder_embed_dim", 16), ("decoder_ffn_embed_dim", 32),
        ("decoder_layers", 1), ("decoder_attention_heads", 2),
    ):
        setattr(args, name, getattr(args, name, value))
    base_architecture(args)
