"""
Plumbing the scripts share: the toy preset's defaults.

`--preset toy` changes defaults, never explicit flags: the parser runs again
with the preset's defaults, so a flag the user typed still wins.
"""


def parse_with_preset(parser, argv, toy_defaults):
    """Parse argv; with --preset toy, parse again with `toy_defaults` as the defaults (the parser is left as it was)."""
    args = parser.parse_args(argv)
    if args.preset != "toy":
        return args
    saved = {k: parser.get_default(k) for k in toy_defaults}
    parser.set_defaults(**toy_defaults)
    try:
        return parser.parse_args(argv)
    finally:
        parser.set_defaults(**saved)
