"""gpufn: serverless GPU functions on your own infrastructure, NVCF-compatible, orchestrated by Temporal."""
