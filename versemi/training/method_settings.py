"""``--method`` settings: a trainer's defaults, named presets, and a check against the known keys."""
from __future__ import annotations

from ..errors import input_error

PRESET_KEY = "preset"


def _same_kind(default, value) -> bool:
    """Whether ``value`` may replace ``default`` (bools stay bools, numbers numbers, pairs pairs)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list)) and len(value) == len(default)
    return isinstance(value, type(default))


def resolve_method_settings(trainer: str, defaults: dict, presets: dict[str, dict], given: dict) -> dict:
    """Defaults, then the preset named by ``given["preset"]`` (if any), then the other given keys.

    Raises:
        InputError: an unknown key (listing the known ones), an unknown preset, or a value of the
            wrong kind; a misspelt setting must never be ignored silently.
    """
    given = dict(given)
    preset = given.pop(PRESET_KEY, None)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(sorted(defaults)) if defaults else "none"
        raise input_error("--method", f"{trainer} has no setting {', '.join(map(repr, unknown))} (known: {known}"
                                      f"{'; presets: ' + ', '.join(sorted(presets)) if presets else ''})",
                          "fix the spelling, or drop the setting")
    settings = dict(defaults)
    if preset is not None:
        if preset not in presets:
            raise input_error("--method", f"{trainer} has no preset {preset!r} (known: "
                                          f"{', '.join(sorted(presets)) or 'none'})", "pick a known preset")
        settings.update(presets[preset])
    for key, value in given.items():
        if not _same_kind(defaults[key], value):
            raise input_error("--method", f"{trainer} setting {key!r} = {value!r} has the wrong type "
                                          f"(default {defaults[key]!r})", f"give {key} a value like its default")
        settings[key] = tuple(value) if isinstance(defaults[key], tuple) else value
    return settings


def pinned(settings: dict, given: dict) -> dict:
    """What a run stores as its method settings: every resolved setting, and the preset it named.

    A run that stored only the settings it was given would take a later version's defaults for the
    others on ``--continue``, and change its loss half-way through when a default changes."""
    preset = given.get(PRESET_KEY)
    return {**({PRESET_KEY: preset} if preset is not None else {}), **settings}


def unsaved(defaults: dict, presets: dict[str, dict], saved: dict) -> list[str]:
    """The settings a saved run holds neither itself nor through its preset (runs saved before
    settings were pinned): they take this version's defaults."""
    covered = set(saved) | set(presets.get(saved.get(PRESET_KEY), {}))
    return sorted(set(defaults) - covered)
