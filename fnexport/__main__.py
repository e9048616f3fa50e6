from fnexport.cli import main

main()
