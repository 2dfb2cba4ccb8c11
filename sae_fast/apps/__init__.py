"""Complete runs on embedded defaults and reports of any run: `sae-fast demo` (demo),
`sae-fast report` (report) and `sae-fast toy` (toy)."""
