"""Pipeline stages: each module has a pure core and a thin `main(paths, params)` doing the I/O."""
