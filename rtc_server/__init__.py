"""Media sessions over WebRTC: microphone in, lip-synced video and audio out."""
