"""Publishing build trees into repositories, and building the thin appliance."""
