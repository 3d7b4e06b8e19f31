"""Build the API reference into ``docs/api/`` with pdoc, offline; any warning is an error.

    python docs/build_api.py [--out DIR] [--warnings-ok]

``cgmq_jax`` resolves its public names lazily (PEP 562), as ``cgmq_jax.nnx`` does the names
of ``cgmq_jax.nnx_specs``; they are resolved first so that pdoc documents them where
users import them from (``cgmq_jax.constrained_update``, ``cgmq_jax.nnx.layer_specs``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

REPO = pathlib.Path(__file__).resolve().parent.parent


def _ours(w: warnings.WarningMessage) -> bool:
    """A warning about our docs; not one of pdoc's two known limits.

    ``optax.Params`` is ``chex.ArrayTree``, a recursive ``typing`` alias that pdoc cannot
    evaluate wherever it appears (the annotation is still shown as written); and the
    ``_: dataclasses.KW_ONLY`` pseudo-field that makes the layers' option fields
    keyword-only has no source line pdoc can find (it is private and not shown).
    """
    text = str(w.message)
    if "Error parsing type annotation" in text and "ArrayTree" in text:
        return False
    if text.startswith("Cannot determine where ") and "._ is taken from" in text:
        return False  # the ``_: dataclasses.KW_ONLY`` marker of the layers' option fields
    return "pdoc" in w.filename or "cgmq_jax" in text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "api"))
    parser.add_argument("--warnings-ok", action="store_true", help="report warnings, go on")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import pdoc

        import cgmq_jax
        import cgmq_jax.export
        import cgmq_jax.nnx

        for package in (cgmq_jax, cgmq_jax.export, cgmq_jax.nnx):
            for name in package.__all__:
                getattr(package, name)
        pdoc.render.configure(docformat="google", search=True)
        pdoc.pdoc("cgmq_jax", output_directory=pathlib.Path(args.out))
    ours = [w for w in caught if _ours(w)]
    for w in ours:
        print(f"warning: {w.message}", file=sys.stderr)
    print(f"API reference: {args.out}/index.html ({len(ours)} warnings)")
    return 1 if ours and not args.warnings_ok else 0


if __name__ == "__main__":
    sys.exit(main())
