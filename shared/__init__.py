"""What every medhive service shares: settings, logging, messages, bus and storage."""
