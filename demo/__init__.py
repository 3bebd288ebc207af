"""``facediffuser demo`` and its labelled stand-ins (toy faces, random-weight Inception, demo model)."""
