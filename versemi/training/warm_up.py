"""The shared supervised warm-up of semi-supervised trainers (``--supervised-warm-up``).

A semi-supervised method that starts from random weights reads noise from its teacher, its peer
or its pseudo-labels, and at the few hundred iterations of a short CPU budget it ends below a
supervised run of the same length (6 to 12 Dice on LA at 20 minutes). So every trainer that uses
unlabeled data first trains supervised, as SupervisedTrainer does (each segmenter it trains on its
own labeled loss), and its method, with every stage and ramp-up the method has, starts after that
on the rest of the schedule, its teachers copied from the warmed-up network.

``auto`` (the default): half the schedule (its seconds under a time budget), and at least
``WARM_UP_ITERATIONS`` iterations, supervised, then the method, but only where the method still gets
``MIN_METHOD_ITERATIONS``; a shorter schedule stays supervised from the first step to the last, so at
short budgets a semi-supervised trainer is the supervised one, never worse. Why half: a method pays
on a model near its supervised plateau (hippocampus MRI at the 40-minute plateau budget, from
scratch: SelfTraining after 1,000 supervised iterations, about a quarter of the schedule, ended
further below SupervisedTrainer than after half of it; benchmarks/RESULTS.md). A warm start
(``--init-from``) has been trained already: no warm-up. A number in [0, 1] gives the share of the
schedule (iterations, or seconds under a time budget) spent warming up; 0 starts the method at once,
as before this setting existed.
"""
from __future__ import annotations

import math

from ..errors import input_error

AUTO = "auto"
# AD-MT's LA-8 log: 85.5 Dice after 1,152 iterations of the full method; a supervised model is
# still far from converged before about a thousand, and a method needs as many to act on top of it.
WARM_UP_ITERATIONS = 1000
MIN_METHOD_ITERATIONS = 1000
AUTO_WARM_UP_SHARE = 0.5  # of the schedule, where that is more than WARM_UP_ITERATIONS


def parse_request(text: str) -> str:
    """``auto`` or a share in [0, 1], normalised; an input error otherwise."""
    text = str(text).strip().lower()
    if text == AUTO:
        return AUTO
    try:
        share = float(text)
    except ValueError:
        share = math.nan
    if not 0.0 <= share <= 1.0:
        raise input_error(f"--supervised-warm-up {text}", "is neither 'auto' nor a share between 0 and 1",
                          "give auto (the default), 0 to start the method at once, or e.g. 0.2")
    return f"{share:g}"


def split_iterations(request: str, total: int, warm_started: bool) -> int:
    """Supervised warm-up iterations out of ``total`` for a request (``parse_request``)."""
    if request == AUTO:
        if warm_started:
            return 0
        warm = max(WARM_UP_ITERATIONS, math.ceil(AUTO_WARM_UP_SHARE * total))
        return warm if total - warm >= MIN_METHOD_ITERATIONS else total
    return min(total, round(float(request) * total))


def split_epochs(request: str, seconds: float, iterations_per_epoch: int, supervised_epoch: float,
                 method_epoch: float, warm_started: bool, alone_epoch: float | None = None) -> tuple[int, int]:
    """(warm-up epochs, method epochs) that fit in ``seconds``, given the seconds an epoch of each
    costs (its steps and the per-epoch overhead). ``alone_epoch``: an epoch of the main network
    alone, what a schedule that stays supervised throughout costs (default ``supervised_epoch``;
    cheaper for trainers of several networks, whose warm-up trains each)."""
    alone_epoch = alone_epoch or supervised_epoch
    if request == AUTO and warm_started:
        request = "0"
    if request == AUTO:
        warm = max(math.ceil(WARM_UP_ITERATIONS / iterations_per_epoch),
                   int(AUTO_WARM_UP_SHARE * seconds // supervised_epoch))
        method = int(max(0.0, seconds - warm * supervised_epoch) // method_epoch)
        if method * iterations_per_epoch >= MIN_METHOD_ITERATIONS:
            return warm, method
        return int(seconds // alone_epoch), 0
    share = float(request)
    if share >= 1:
        return int(seconds // alone_epoch), 0
    return int(share * seconds // supervised_epoch), int((1 - share) * seconds // method_epoch)


def describe(request: str, warm_up_epochs: int, epochs: int, iterations_per_epoch: int, warm_started: bool) -> str:
    """The training log's line on the warm-up a run got, and why."""
    warm, total = warm_up_epochs * iterations_per_epoch, epochs * iterations_per_epoch
    if warm_up_epochs >= epochs:
        why = (f"fewer than {WARM_UP_ITERATIONS} + {MIN_METHOD_ITERATIONS} iterations" if request == AUTO
               else f"--supervised-warm-up {request}")
        return (f"supervised warm-up: the whole schedule ({total} iterations) trains supervised ({why}); "
                f"the method's unlabeled terms never start, and only the main network trains and predicts")
    if warm_up_epochs == 0:
        why = "a warm start" if request == AUTO and warm_started else f"--supervised-warm-up {request}"
        return f"supervised warm-up: none ({why}); the method trains from the first iteration"
    return (f"supervised warm-up: epochs 1-{warm_up_epochs} ({warm} iterations) supervised, then the method "
            f"for {total - warm} iterations (--supervised-warm-up {request})")
