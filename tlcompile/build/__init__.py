"""The build half: ``build(recipe, out_dir)`` runs the stages (:mod:`tlcompile.build.stages`) in a loop
(:mod:`tlcompile.build.loop`) over a shared context (:mod:`tlcompile.build.context`). See docs/ARCHITECTURE.md."""

from tlcompile.build.loop import BuildResult, build

__all__ = ["BuildResult", "build"]
