"""Who may download what: tokens with scopes, signed links, public settings, limits."""
