"""The study presets that come with the install: search_spaces/*.yaml, found by name (`ercstudy run quickstart`)."""
