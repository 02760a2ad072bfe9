"""The data cache: stages XNAT, PACS and HTTP inputs, keeps them encrypted at rest, and
lets a job's node read them only while the job runs."""
