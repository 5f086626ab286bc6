"""What a run reads: image folders and lists, text files, webdataset tars, parquet tables and
clip-retrieval embedding folders, listed once into an item index."""
