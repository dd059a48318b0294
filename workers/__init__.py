"""The batching RQ worker: models kept warm, continuous batching of denoising steps across jobs."""
