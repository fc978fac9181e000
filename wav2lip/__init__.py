"""Wav2Lip as pure computation: the generator, its checkpoints, the mel front end, faces,
blending, the batched engine and the offline renderer. No networking lives here."""
