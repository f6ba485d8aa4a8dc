"""Reading the CSV files that ship with Broden (index.csv, label.csv)."""
import csv
import os

from jaxdissect import errors


def csv_column(path: str, column: str, field: str) -> list[str]:
  """The stripped values of one column of a Broden CSV file, in file order.

  A file without the column is a UserError on config field `field`."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if column not in (reader.fieldnames or []):
      raise errors.UserError(field, f"{path} has no {column!r} column.",
                             f"give the {os.path.basename(path)} that ships with Broden.")
    return [row[column].strip() for row in reader]
