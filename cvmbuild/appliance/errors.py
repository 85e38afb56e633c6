"""The appliance builder's errors, under cvmbuild's BuildError."""

from cvmbuild.errors import BuildError


class ApplianceError(BuildError):
    """Building, exporting or booting an appliance failed."""


class RecipeError(ApplianceError):
    """A recipe file is malformed; the message names the file, line and key."""


class ToolError(ApplianceError):
    """An external tool (mmdebstrap, qemu-img, mksquashfs...) failed or is missing."""


class BootError(ApplianceError):
    """The appliance did not come up, mount its repository or finish its job."""
