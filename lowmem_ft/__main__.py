from lowmem_ft.cli import main

main()
