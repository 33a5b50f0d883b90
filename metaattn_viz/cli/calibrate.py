"""`metaattn-viz calibrate`: train the controllers (training/calibrate.py) from a text file;
every hyperparameter the recipe table of docs/results.md varies is a flag here."""

from __future__ import annotations


def add_calibrate_parser(sub) -> None:
    from metaattn_viz.cli import _add_controller_arg, _add_model_args
    from metaattn_viz.core.settings import LINEAR_MAPS

    p = sub.add_parser("calibrate", help="train the controllers (ELBO / prior-free baseline)")
    p.add_argument("--data", required=True, help="UTF-8 text file (WikiText-2 raw works)")
    _add_controller_arg(p)
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta-kl", type=float, default=None, help="weight of the prior KL (bayes)")
    p.add_argument("--cost-weight", type=float, default=None, help="weight of E[cost] (priorfree)")
    p.add_argument("--prior-gamma", type=float, default=None, help="prior sharpness gamma (bayes; default 1)")
    p.add_argument(
        "--prior-costs",
        default=None,
        help="the costs the prior prices full,linear,local at (bayes; default the notional 1,0.15,0.3)",
    )
    p.add_argument(
        "--linear-map",
        default=None,
        choices=LINEAR_MAPS,
        help="the linear expert's map while training (default elu)",
    )
    p.add_argument(
        "--features", default=None, help="controller feature groups, comma-separated (default base)"
    )
    p.add_argument(
        "--aux-weight", type=float, default=None, help="weight of the error-ranking target (default 0)"
    )
    p.add_argument(
        "--aux-scope",
        default=None,
        choices=("global", "layer", "both"),
        help="over which decisions the target ranks (default global)",
    )
    p.add_argument(
        "--train-budgets", default=None, help="budgets sampled for the hard steps, comma-separated"
    )
    p.add_argument(
        "--out", default=None, help="output folder (default assets/controllers/<model>/<controller>)"
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu|cuda|cuda:N|auto, always in float32 (default cpu, where the shipped controllers "
        "were trained)",
    )
    _add_model_args(p, runtime=False)
    p.set_defaults(handler=_cmd_calibrate)


def _cmd_calibrate(args) -> int:
    import json

    from metaattn_viz.cli import UserError, _parse_budgets
    from metaattn_viz.routing import device as device_mod
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.training import data as data_mod
    from metaattn_viz.training.calibrate import CalibrationConfig, calibrate

    budgets = None
    if args.train_budgets is not None:
        try:  # a budget out of range, named by the flag it came from
            budgets = _parse_budgets(args.train_budgets, "--train-budgets")
        except ValueError as exc:
            raise UserError(f"--train-budgets: {exc}") from None
    listed = {
        "features": None if args.features is None else tuple(f.strip() for f in args.features.split(",")),
        "train_budgets": budgets,
        "prior_costs": None
        if args.prior_costs is None
        else _parse_numbers("--prior-costs", args.prior_costs),
    }
    overrides = {
        k: v
        for k, v in [
            ("steps", args.steps),
            ("beta_kl", args.beta_kl),
            ("cost_weight", args.cost_weight),
            ("prior_gamma", args.prior_gamma),
            ("linear_map", args.linear_map),
            ("aux_weight", args.aux_weight),
            ("aux_scope", args.aux_scope),
            *listed.items(),
        ]
        if v is not None
    }
    try:
        cfg = CalibrationConfig(controller=args.controller, seed=args.seed, **overrides)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.training import checkpoints

    out = check_output(args.out, "--out", folder=True)  # before training, which takes minutes
    try:
        # float32 wherever it runs (training is not checked in lower precision); CUDA asked for
        # without one is refused here, before the data and the model load
        device_mod.resolve(args.device, "float32")
        data_mod.load_split(args.data)  # fail on a bad file before loading the model
        if out is not None and not args.resume:  # an unfinished run's checkpoint, before the load
            checkpoints.refuse_unfinished(out)
    except (data_mod.DataError, device_mod.DeviceUnavailable, checkpoints.CheckpointError) as exc:
        raise UserError(str(exc)) from None
    # the reference backend in training (routing/policies.py, differentiable) on any device
    routed = RoutedModel.load(args.model, device=args.device, dtype="float32", backend="auto")
    try:
        meta = calibrate(routed, args.data, cfg, out_dir=out, resume=args.resume)
    except data_mod.TooShort as exc:  # calibrate has no --seq-len: the remedy is the file
        raise UserError(str(exc.with_remedy(too_short_remedy(exc.what)))) from None
    except data_mod.DataError as exc:
        raise UserError(str(exc)) from None
    print(
        json.dumps(
            {
                "controller": meta["controller"],
                "content_hash": meta["content_hash"],
                "final_validation_terms": meta["final_validation_terms"],
            }
        )
    )
    return 0


def too_short_remedy(what: str) -> str:
    """What to do when calibrate's training or validation text does not fill one window
    (its windows have a fixed length: there is no --seq-len to shorten)."""
    from metaattn_viz.training.data import VALIDATION_EVERY

    if what == "validation":
        return (
            f"give a file whose validation articles (every {VALIDATION_EVERY}th, or the last one "
            f"when there are fewer than {VALIDATION_EVERY}) are longer"
        )
    return "give a longer file"


def _parse_numbers(flag: str, text: str) -> list[float]:
    """Comma-separated numbers, or a UserError naming the flag (the range is checked where
    the values are used)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        from metaattn_viz.cli import UserError

        raise UserError(f"{flag} must be comma-separated numbers, got {text!r}") from None
