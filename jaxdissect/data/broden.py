"""Reading the CSV files that ship with Broden (index.csv, label.csv)."""
import csv

from jaxdissect import errors


def csv_column(path: str, column: str, field: str, broden_file: str) -> list[str]:
  """The stripped values of one column of a Broden CSV file, in file order.

  A file without the column is a UserError on config field `field` that asks for
  Broden's own `broden_file` (e.g. "label.csv")."""
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f)
    if column not in (reader.fieldnames or []):
      raise errors.UserError(field, f"{path} has no {column!r} column.",
                             f"give the {broden_file} that ships with Broden.")
    return [row[column].strip() for row in reader]
