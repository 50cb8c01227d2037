"""`meshtron chat`: not implemented yet (issue 7)."""

from meshtron.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("rest", nargs="*", help="arguments (not accepted yet)")


def run(args) -> int:
    raise UserError("'meshtron chat' is not implemented yet in this version (tracked in issue 7)")
