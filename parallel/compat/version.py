"""The megatron-core releases the patches in this package were verified against."""
from __future__ import annotations

VERIFIED = ("0.16.1",)


class UnverifiedMegatronVersion(RuntimeError):
    """megatron-core is a release the patches were not checked against: each patch replaces a
    private function whose body or signature may have changed, so none may be applied."""


def check_megatron_version() -> None:
    """Raise one line naming the installed and verified versions unless they match."""
    import megatron.core

    installed = megatron.core.__version__
    if installed not in VERIFIED:
        raise UnverifiedMegatronVersion(
            f"megatron-core {installed} is installed; parallel/compat is verified for {', '.join(VERIFIED)} only: "
            f"install a verified version or re-verify each patch (tests/unit/test_compat.py) and add it to VERIFIED")
