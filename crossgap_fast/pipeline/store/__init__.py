"""The output folder: the shard schema (plain ``.npy`` + parquet metadata), writing and
finishing shards, reading them back and exporting."""
