"""Blind human evaluation of model answers: a small web app for clinicians, with agreement statistics.

    alpacare-human-eval create --outputs A.json B.json --sample 100 --seed 0 --raters 3 --db study.sqlite
    alpacare-human-eval serve --db study.sqlite
    alpacare-human-eval results --db study.sqlite

Nothing here imports JAX (a study server runs on any small machine): `study` makes the database, `app`
serves it, `results` and `stats` compute the numbers, `chart` draws them, `cli` is the command line.
"""
