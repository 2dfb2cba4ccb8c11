"""Complete runs on embedded defaults: `sae-fast demo` (demo) and `sae-fast toy` (toy)."""
