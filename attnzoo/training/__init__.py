"""Training: mesh and sharding rules, optimizers, losses, pure steps, checkpoints, loop, CLI.

``attnzoo.training.loop.train(config, workdir)`` runs an experiment;
``attnzoo.training.checkpoint.load_for_inference(workdir)`` restores what it trained.
"""
