"""torch.hub entry points: one per registered model, e.g.

    torch.hub.load('<owner>/xcit', 'xcit_nano_12_p8_224', pretrained=True)
    torch.hub.load('/path/to/xcit', 'cvt_13_224', source='local', num_classes=10)

Unlike facebookresearch/xcit's hub entry points, `pretrained` is honoured:
`pretrained=True` loads the model's default published weights ('arch.tag' names pick another set).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'src'))

from xcit import create_model, list_models  # noqa: E402

dependencies = ['torch', 'numpy']  # what building a model imports; safetensors only to read .safetensors


def _entry_point(name):
    def build(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)
    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"{name}: create_model('{name}', pretrained=pretrained, **kwargs)"
    return build


for _name in list_models():
    globals()[_name] = _entry_point(_name)
