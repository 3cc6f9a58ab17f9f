"""Work in SQL: study completion into jobs, running a job, reconciling the queue with SQL."""
