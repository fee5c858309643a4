"""verify's default settings, shared by its command line and by release jobs (which run it with a recipe's
settings over these).  Small, fast settings: a few seconds a file on a tiny model; a release states its own."""

VERIFY = {"height": 256, "width": 256, "steps": 4, "cfg": 1.0, "schedule": "lightning", "seed": 0,
          "runtime": "native", "synthetic": 2, "seeds": 2}
