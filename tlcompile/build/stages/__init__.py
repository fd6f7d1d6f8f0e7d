"""The build's stages, one module each, in the order the loop runs them (:data:`tlcompile.build.loop.STAGES`).

Each module declares ``STAGE`` (:class:`tlcompile.build.context.Stage`): its folder, the recipe sections it reads
and ``run(ctx, artifacts) -> artifacts``."""
