"""The data cache: stages XNAT, PACS and HTTP inputs, encrypted at rest (next issue)."""
